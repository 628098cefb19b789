"""``pq web``: an HTTP/JSON API under ``/v1/`` in front of a cluster.

One small ASGI process (Starlette, served by uvicorn) that talks gRPC to the
balancer through the SDK (``pqueue.client.Client``): ``app`` builds the
routes, ``errors`` maps the SDK's errors to HTTP statuses, ``openapi`` is the
description served at ``/openapi.json``. Nothing else in pqueue imports this
package: the SDK and the other ``pq`` commands load no web stack.
"""
