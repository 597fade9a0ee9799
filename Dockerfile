# The controlplane server image (also runs the lab's demo apps in docker-compose.yml).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controlplane ./controlplane
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# iptables: injected pods' init container runs `controlplane capture` from this image.
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home controlplane
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /tmp
EXPOSE 18000 19000 15017
ENTRYPOINT ["controlplane"]
CMD ["serve", "--source", "file:/etc/controlplane/mesh.yaml", "--snapshot-dir", "/tmp/snapshots"]
