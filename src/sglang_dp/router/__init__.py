"""The router: approximate radix tree, policies and routing engine (pure) and the HTTP shell."""
