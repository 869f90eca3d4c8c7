"""Schemathesis hooks for tests/test_openapi.py: tus PATCH bodies (application/offset+octet-stream)
are raw bytes, sent as schemathesis sends application/octet-stream."""

import schemathesis
from schemathesis.transport.requests import binary_serializer


@schemathesis.serializer("application/offset+octet-stream")
def offset_octets(ctx, value):
    return binary_serializer(ctx, value)
