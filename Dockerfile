# enkwatch: the daemon as PID 1, non-root, exec-form entrypoint (SIGTERM reaches it).
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ENKWATCH_CONFIG=/etc/enkwatch/config.yaml \
    ENKWATCH_STATE__PATH=/var/lib/enkwatch/state.db \
    PATH=/opt/enkwatch/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN python3 -m venv /opt/enkwatch \
 && /opt/enkwatch/bin/pip install . \
 && rm -rf /src \
 && groupadd --system --gid 10001 enkwatch \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/enkwatch --shell /usr/sbin/nologin enkwatch \
 && mkdir -p /etc/enkwatch /var/lib/enkwatch \
 && chown enkwatch:enkwatch /var/lib/enkwatch

COPY config/example.yaml /etc/enkwatch/config.yaml
WORKDIR /var/lib/enkwatch
VOLUME ["/var/lib/enkwatch"]
USER 10001:10001

ENTRYPOINT ["enkwatch"]
CMD ["run"]
