"""HTTP routes: each parses input, calls a service, commits when it wrote, returns a schema."""
