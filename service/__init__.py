"""digitserve: a LitServe microservice for handwritten-digit classification."""
