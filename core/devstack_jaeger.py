"""The local stack's Jaeger: Jaeger v2 all-in-one with in-memory storage, part ``jaeger``, run
from the binary `scripts/go-tools.sh jaeger` builds (``.hoptrace/tools/bin/jaeger``). `hoptrace
dev up` starts it before hoptrace's services when that binary exists (and says it skipped it
otherwise); the services then export every span to it as well as to the collector
(``HOPTRACE_EXPORT_ALSO``, see :func:`~.devstack_process.stack_env`), and their links point at
its UI (``HOPTRACE_JAEGER_URL``).

Ports (``HOPTRACE_DEV_JAEGER_*``): the UI and query API 16686, the query gRPC API 16685, the OTLP
gRPC receiver 14317 (4317 is the collector's). Ready when its query API answers."""

from __future__ import annotations

import httpx

from .devstack_config import STACK_FILES, StackConfig, StackError
from .devstack_process import Part, PartStatus, port_open

CONFIG = STACK_FILES / "jaeger.yaml"


class JaegerPart(Part):
    def __init__(self, cfg: StackConfig) -> None:
        super().__init__("jaeger", cfg, port=cfg.jaeger_port, marker="jaeger")
        self.env = {
            "JAEGER_QUERY_HTTP_PORT": str(cfg.jaeger_port),
            "JAEGER_QUERY_GRPC_PORT": str(cfg.jaeger_grpc_port),
            "JAEGER_OTLP_GRPC_PORT": str(cfg.jaeger_otlp_port),
        }

    @property
    def built(self) -> bool:
        """The binary exists (else `dev up` skips the part)."""
        return self.cfg.jaeger_binary.is_file()

    def prepare(self) -> None:
        if not self.built:
            raise StackError(
                f"jaeger: {self.cfg.jaeger_binary} not found; build it with "
                "`scripts/go-tools.sh jaeger` (Go 1.24+, about 10 minutes once)"
            )
        for port in (self.cfg.jaeger_grpc_port, self.cfg.jaeger_otlp_port):
            if port_open(port):
                raise StackError(
                    f"jaeger: port {port} is already taken by a process hoptrace did not start; "
                    "free it or move it (HOPTRACE_DEV_JAEGER_GRPC_PORT, HOPTRACE_DEV_JAEGER_OTLP_PORT)"
                )

    def command(self) -> list[str]:
        return [str(self.cfg.jaeger_binary), f"--config=file:{CONFIG}"]

    def ready(self) -> bool:
        try:
            resp = httpx.get(f"{self.cfg.jaeger_url}/api/services", timeout=1.0, trust_env=False)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    def status(self) -> PartStatus:
        st = super().status()
        st.expected = self.pid_file.exists()  # optional: only "down" once it was started
        return st
