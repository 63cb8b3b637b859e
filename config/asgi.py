import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()  # before importing consumers: it sets Django up

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from operations.routing import websocket_urlpatterns as run_sockets  # noqa: E402
from rollouts.routing import websocket_urlpatterns as rollout_sockets  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Origin check stops another site's page from opening a socket with our cookie.
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(run_sockets + rollout_sockets))),
    }
)
