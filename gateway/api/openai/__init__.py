"""The OpenAI-compatible surface (/v1): router, protocol, serving."""

from gateway.api.openai.protocol import openai_error_response
from gateway.api.openai.router import router

__all__ = ["openai_error_response", "router"]
