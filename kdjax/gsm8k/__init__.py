"""GSM8K: loading the data set, the answer extraction rules, and how much a response copies a reference solution."""
