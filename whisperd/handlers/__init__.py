"""HTTP handlers: thin layers that parse, call the service and shape the JSON."""
