"""The OpenAI-compatible gateway: `quotagate serve`.

>>> from quotagate import Engine
>>> from quotagate.gateway import Gateway
>>> app = Gateway(Engine.from_url("sqlite:///quotagate.db"))  # doctest: +SKIP
"""

from quotagate.gateway.app import Gateway
from quotagate.gateway.channels import Channel

__all__ = ["Channel", "Gateway"]
