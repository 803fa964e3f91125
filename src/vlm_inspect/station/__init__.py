"""The inspection station: every verdict recorded, reviewed by an operator, and exported as training data."""
