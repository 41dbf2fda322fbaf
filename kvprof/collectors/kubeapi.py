"""Pod names, namespaces and labels of this node's pods from the Kubernetes API (read-only)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RBAC_HINT = "the kvprof ServiceAccount needs get/list/watch on pods (manifests/base/rbac.yaml)"


class KubeApiUnavailable(Exception):
    """The Kubernetes API could not be asked; the message is the reason."""


@dataclass(frozen=True, slots=True)
class PodMeta:
    """What placement needs to know about one pod."""

    uid: str
    name: str
    namespace: str
    labels: dict[str, str]


class KubePodSource:
    """Lists the pods bound to one node; ``api_client`` is a parameter so tests can aim it
    at a local HTTP server, production builds one from the in-cluster config."""

    def __init__(self, api_client: Any | None = None, timeout_s: float = 3.0):
        self._api_client = api_client
        self.timeout_s = timeout_s

    def _client(self) -> Any:
        if self._api_client is None:
            if not os.environ.get("KUBERNETES_SERVICE_HOST"):
                # Checked before importing the (slow to import) client: the common laptop case.
                raise KubeApiUnavailable("not running in a Kubernetes pod "
                                         "(KUBERNETES_SERVICE_HOST unset)")
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException as err:
                raise KubeApiUnavailable(f"not running in a Kubernetes pod: {err}") from err
            configuration = client.Configuration.get_default_copy()
            # One try per sample: the next placement tick is the retry.
            configuration.retries = False
            self._api_client = client.ApiClient(configuration)
        return self._api_client

    def pods_on_node(self, node: str) -> list[PodMeta]:
        api_client = self._client()  # first: it refuses cheaply outside a cluster
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        api = client.CoreV1Api(api_client)
        try:
            pods = api.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}" if node else None,
                _request_timeout=(self.timeout_s, self.timeout_s),
            )
        except ApiException as err:
            reason = f"Kubernetes API: {err.status} {err.reason}"
            if err.status in (401, 403):
                reason += f" ({RBAC_HINT})"
            raise KubeApiUnavailable(reason) from err
        except (Urllib3Error, OSError) as err:
            kind = "timeout" if "timed out" in str(err).lower() else "unreachable"
            raise KubeApiUnavailable(f"Kubernetes API {kind}: {type(err).__name__}") from err
        return [
            PodMeta(uid=p.metadata.uid, name=p.metadata.name, namespace=p.metadata.namespace,
                    labels=dict(p.metadata.labels or {}))
            for p in pods.items
        ]
