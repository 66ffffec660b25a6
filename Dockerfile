# syntax=docker/dockerfile:1
# relay: durable webhook relay. Build: docker build -t relay .
# Run:   docker run --read-only -e RELAY_TOKEN=... -v $PWD/relay.yaml:/etc/relay/config.yaml:ro \
#          -v relay-spool:/var/lib/relay -p 8080:8080 relay

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: wheels for relay and every dependency, at the versions requirements.lock pins --
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY relay ./relay
# requirements.lock is made by pip-tools' pip-compile (see docs/deploying.md, "Updating the lock file").
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint requirements.lock '.[postgres]'
# The runtime's environment: a venv without pip, holding relay and its locked dependencies
# only (installed by the build stage's pip from the wheels above; no index is consulted).
# hadolint ignore=DL3013
RUN python -m venv --without-pip /opt/relay \
 && pip --python /opt/relay/bin/python install --no-cache-dir --no-index --find-links=/wheels \
      --constraint requirements.lock 'relay[postgres]'

# --- runtime: the venv, a non-root user, a volume for the spool; no pip or setuptools -----
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="Durable webhook relay for mail/SMS delivery feedback (AJO, Braze, Liquid templates)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/relay"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAY_LOG_FORMAT=json \
    PATH=/opt/relay/bin:$PATH

# The base image's own installers go: the image holds relay's wheels and nothing else to run.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
 && groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /var/lib/relay --no-create-home \
      --shell /usr/sbin/nologin relay \
 && install -d -o relay -g relay -m 0750 /var/lib/relay \
 && install -d -m 0755 /etc/relay

COPY --from=build /opt/relay /opt/relay
COPY docker/config.yaml /etc/relay/config.yaml

USER 10001:10001
WORKDIR /var/lib/relay
VOLUME ["/var/lib/relay"]
EXPOSE 8080
STOPSIGNAL SIGTERM
# healthcheck -c reads only server.listen from the file: it asks the running relay, and a
# config edit the relay refused cannot fail it
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["relay", "healthcheck", "-c", "/etc/relay/config.yaml"]
ENTRYPOINT ["relay"]
CMD ["serve", "-c", "/etc/relay/config.yaml"]
