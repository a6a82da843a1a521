"""What runs in the API server processes: the request handler, its inputs and schemas, and the routes."""
