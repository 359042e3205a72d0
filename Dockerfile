# syntax=docker/dockerfile:1
# One image for every hoptrace command (ENTRYPOINT hoptrace):
#   docker run --rm hoptrace:0.1.0 worker purchase-worker | collector | dashboard | topics ensure ...
# Built by `docker compose build` (docker-compose.yml); installs the package from pyproject.toml.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG RUST_IMAGE=rust:1.95-slim-bookworm

# The Rust toolchain only: its files are copied into the native stage below.
FROM ${RUST_IMAGE} AS rust

# hoptrace_native (native/): the OTLP codec as an abi3 wheel, built by maturin.
FROM ${PYTHON_IMAGE} AS native
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
WORKDIR /src
COPY native ./native
RUN pip wheel --no-deps -w /wheels ./native

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/hoptrace
COPY --from=native /wheels /wheels
COPY pyproject.toml constraints.txt README.md* ./
COPY core ./core
COPY instrumentation ./instrumentation
COPY workers ./workers
COPY collector ./collector
COPY dashboard ./dashboard
COPY repair ./repair
RUN /opt/hoptrace/bin/pip install -c constraints.txt . /wheels/*.whl \
    && /opt/hoptrace/bin/python -c "import hoptrace_native" \
    && /opt/hoptrace/bin/hoptrace --help >/dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 hoptrace \
    && useradd --system --uid 10001 --gid hoptrace --create-home --home-dir /home/hoptrace \
       --shell /usr/sbin/nologin hoptrace
COPY --from=build /opt/hoptrace /opt/hoptrace
COPY pipelines /app/pipelines
ENV PATH=/opt/hoptrace/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOPTRACE_PIPELINE=/app/pipelines/payments.toml \
    HOPTRACE_HOME=/tmp/hoptrace \
    HOPTRACE_BIND_HOST=0.0.0.0
WORKDIR /app
USER 10001:10001
# collector OTLP gRPC/HTTP, payment-service, admin-service, dashboard
EXPOSE 4317 4318 8081 8082 8501
ENTRYPOINT ["hoptrace"]
CMD ["--help"]
