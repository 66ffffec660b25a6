# syntax=docker/dockerfile:1
# relay: durable webhook relay. Build: docker build -t relay .
# Run:   docker run --read-only -v relay-spool:/var/lib/relay -p 8080:8080 relay

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: wheels for relay and every dependency ---------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: only the installed wheels, a non-root user, a volume for the spool ---------
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="Durable webhook relay for mail/SMS delivery feedback (AJO, Braze, Liquid templates)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/relay"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAY_LOG_FORMAT=json

RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /var/lib/relay --no-create-home \
      --shell /usr/sbin/nologin relay \
 && install -d -o relay -g relay -m 0750 /var/lib/relay \
 && install -d -m 0755 /etc/relay

# The wheels are the ones built above, pinned by the build itself; no index is consulted.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels relay

COPY docker/config.yaml /etc/relay/config.yaml

USER 10001:10001
WORKDIR /var/lib/relay
VOLUME ["/var/lib/relay"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["relay", "healthcheck", "-c", "/etc/relay/config.yaml"]
ENTRYPOINT ["relay"]
CMD ["serve", "-c", "/etc/relay/config.yaml"]
