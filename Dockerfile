# gradserve server image: `docker build -t gradserve .`, then
# `docker run --rm -p 50051:50051 -p 9464:9464 gradserve` (see docs/deployment.md).
#
# Two stages. The builder turns the source into a wheel and installs it, with its dependencies,
# into a virtual environment at /opt/venv. The final stage is a fresh slim Python with only that
# environment copied in: no compilers, no build tools, no pip cache, no source tree.
# Both stages use the same base image, so the venv's interpreter links stay valid.

FROM python:3.11-slim-bookworm AS builder

# No pip cache, no version nagging, no .pyc files from the build tools themselves.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Only what the wheel is built from (.dockerignore keeps everything else out of the context).
# protos/ carries the committed generated code (gradserve.v1); pyproject.toml maps the
# top-level directories onto the gradserve.* packages.
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY importer/ importer/
COPY wire/ wire/
COPY server/ server/
COPY client/ client/
COPY cli/ cli/
COPY protos/ protos/

# The venv is made without pip (the final image needs none); the base image's pip installs
# into it through --python. Every dependency ships manylinux wheels, so nothing is compiled.
# pip byte-compiles what it installs, so the server runs from a read-only file system.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir /wheels/gradserve-*.whl


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="gradserve" \
      org.opencontainers.image.description="Reverse-mode autodiff as a gRPC service" \
      org.opencontainers.image.licenses="MIT"

# A fixed, non-root UID/GID (10001), so Kubernetes' runAsNonRoot can check it and volume
# ownership is predictable. No home directory, no login shell.
RUN groupadd --system --gid 10001 gradserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gradserve

COPY --from=builder /opt/venv /opt/venv

# Listen on every interface inside the container (the server's default is loopback only);
# logs go straight to the container's stdout/stderr.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    GRADSERVE_HOST=0.0.0.0

USER 10001:10001

# gRPC, and Prometheus /metrics.
EXPOSE 50051 9464

# The server handles SIGTERM itself: health turns NOT_SERVING, calls in flight drain within
# --grace-seconds (25 by default; give `docker stop -t` / stop_grace_period more than that).
STOPSIGNAL SIGTERM

# Healthy only while the gRPC health service says SERVING. The port is the default one: if you
# change GRADSERVE_PORT, override this check too.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["gradserve", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]

# Exec form, no shell and no init: PID 1 is the `gradserve` process, so SIGTERM reaches the
# server's own handler directly. No init (tini) is needed: the server installs handlers for
# SIGTERM and SIGINT (PID 1 ignores signals it has no handler for) and waits for any worker
# processes it starts itself, so no zombies accumulate.
ENTRYPOINT ["gradserve"]
CMD ["serve"]
