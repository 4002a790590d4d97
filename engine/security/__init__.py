"""Sensitive payload fields: the key store, sealing and unsealing, redaction."""
