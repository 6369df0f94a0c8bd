"""`mpad serve`: an exported model (mpad.deploy) as an HTTP service with dynamic batching and a page.

mpad.serve.app (routes, limits, errors), mpad.serve.connections (uvicorn's settings, the connection cap, the
header limits, the lingering close), mpad.serve.access (the API key, the access log), mpad.serve.metrics
(/metrics), mpad.serve.lanes (the decode lanes and their pixel budget), mpad.serve.batcher (dynamic batching),
mpad.serve.images (request bodies -> images), mpad.serve.model (the model, its identity, the per-image answer),
page.html (the page). Needs the optional extras `serve` and `export`; imports neither open_clip nor the model code.
"""
