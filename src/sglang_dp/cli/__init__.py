"""Command-line interface: one module per command; nothing else imports this package."""
