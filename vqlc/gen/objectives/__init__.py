"""Training objectives of the generators: next-token cross-entropy and its input corruptions."""
