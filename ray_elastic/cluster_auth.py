"""Before joining a Ray cluster at an explicit address: can this process authenticate to it?

Ray 2.52+ protects a cluster started with `RAY_AUTH_MODE=token` (or, since 2.59, a
`ray start --head` on a machine that holds `~/.ray/auth_token`) with a shared token.
A client sends its token to an explicit address only when its own `RAY_AUTH_MODE`
is `token`; without it, or with the wrong token, `ray.init(address=...)` retries for
about 20 s and fails with a bare ConnectionError. One GCS call made the way Ray makes
them (`GetClusterId`, with Ray's own channel and auth interceptor) tells in
milliseconds, so `run` can say what to set before anything starts.
"""

from __future__ import annotations

import logging
import os

from ray_elastic.errors import ConfigError

logger = logging.getLogger("ray_elastic")

_HOW = (
    "Give it the cluster's token with RAY_AUTH_MODE=token plus one of: RAY_AUTH_TOKEN=<token>, "
    "RAY_AUTH_TOKEN_PATH=<file holding it>, or the file ~/.ray/auth_token (on the head node, "
    "`ray get-auth-token` prints the token it was started with)."
)


def token_source() -> str:
    """Where Ray reads this process's token from, in Ray's order of precedence."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def check_cluster_access(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with what to set, when the cluster at `address` would refuse this process's credentials.

    Only explicit GCS addresses ("host:port") are checked; "local", "auto" and "ray://"
    addresses, an unreachable cluster, or a Ray without token authentication are left to
    `ray.init`, which reports those itself.

    Raises:
        ConfigError: token authentication is required and no token, or the wrong one, would be sent.
    """
    if not address or address in ("local", "auto") or "://" in address:
        return
    try:
        import grpc
        from ray._private import services
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
        from ray._private.grpc_utils import init_grpc_channel
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # a Ray without token authentication
        return
    try:
        target = services.canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 - a malformed address: ray.init says so
        return
    if target is None:
        return
    sends_token = is_token_auth_enabled()
    if sends_token and not AuthenticationTokenLoader.instance().has_token():
        raise ConfigError(
            f"RAY_AUTH_MODE=token is set but no Ray token was found (looked in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            f"and {token_source()}), so the cluster at {address} cannot be joined. {_HOW}"
        )
    try:
        channel = init_grpc_channel(target)
    except Exception:  # noqa: BLE001 - Ray's private helper changed: leave the check to ray.init
        logger.debug("cluster access check of %s skipped", address, exc_info=True)
        return
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code != grpc.StatusCode.UNAUTHENTICATED:
            logger.debug("cluster access check of %s inconclusive: %s", address, code)
            return
        if sends_token:
            raise ConfigError(
                f"the Ray cluster at {address} rejected the token read from {token_source()}: it is not the token "
                f"this cluster was started with. {_HOW}"
            ) from None
        raise ConfigError(
            f"the Ray cluster at {address} requires token authentication, and this process sends no token (Ray "
            f"sends one to an explicit address only when RAY_AUTH_MODE=token is set). {_HOW}"
        ) from None
    except Exception:  # noqa: BLE001 - anything else is ray.init's to report
        logger.debug("cluster access check of %s inconclusive", address, exc_info=True)
    finally:
        channel.close()
