# enkwatch: the daemon as PID 1, non-root, exec-form entrypoint (SIGTERM reaches it).
#
#   docker build -t enkwatch .
#   docker run -d --read-only --tmpfs /tmp -v enkwatch-state:/var/lib/enkwatch \
#     -e ENKRYPTAI_API_KEY enkwatch
#
# PYTHON_IMAGE may be any Debian-based image with python3 (>= 3.11) and its venv module.
ARG PYTHON_IMAGE=python:3.12-slim

# --- build: a wheel of enkwatch, and a virtual environment with it and its dependencies ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/enkwatch
WORKDIR /src
# dependencies first, in their own layer: a code change does not download them again
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > requirements.txt \
 && /opt/enkwatch/bin/pip install --quiet -r requirements.txt
COPY README.md ./
COPY daemon ./daemon
RUN /opt/enkwatch/bin/pip wheel --quiet --no-deps --wheel-dir /wheels . \
 && /opt/enkwatch/bin/pip install --quiet --no-deps /wheels/enkwatch-*.whl \
 && /opt/enkwatch/bin/pip uninstall --quiet --yes pip setuptools \
 && /opt/enkwatch/bin/enkwatch --version

# --- runtime: the base image, a user, the venv; no compiler, no pip, no source tree ---
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="enkwatch" \
      org.opencontainers.image.description="Watches Enkrypt AI dataset-generation tasks and writes one JSON event per status transition" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/containers.md"

# PYTHONDONTWRITEBYTECODE: the root filesystem may be read-only (the venv holds compiled
# .pyc already); the state DB (and its WAL) is the only thing the daemon writes.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ENKWATCH_CONFIG=/etc/enkwatch/config.yaml \
    PATH=/opt/enkwatch/bin:$PATH

RUN groupadd --system --gid 10001 enkwatch \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/enkwatch --shell /usr/sbin/nologin enkwatch \
 && mkdir -p /etc/enkwatch /var/lib/enkwatch \
 && chown 10001:10001 /var/lib/enkwatch \
 && chmod 0750 /var/lib/enkwatch

COPY --from=build /opt/enkwatch /opt/enkwatch
COPY config/container.yaml /etc/enkwatch/config.yaml

# a relative state.path (the embedded default) lands in the volume too
WORKDIR /var/lib/enkwatch
VOLUME ["/var/lib/enkwatch"]
EXPOSE 9090
USER 10001:10001

# asks the daemon's own /healthz (admin.listen of $ENKWATCH_CONFIG); no curl in the image
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["enkwatch", "healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["enkwatch"]
CMD ["run"]
