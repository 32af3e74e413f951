# syntax=docker/dockerfile:1
# Build stage: compile wheels (uvloop, asyncpg, bcrypt have C parts) into a venv.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/nexgate
ENV PATH=/opt/nexgate/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nexgate_proxy ./nexgate_proxy
COPY plugins ./plugins
RUN pip install --no-cache-dir --upgrade pip && pip install --no-cache-dir .

# Runtime stage: the venv and a config, run as an unprivileged user.
FROM python:3.11-slim
RUN groupadd --system nexgate && useradd --system --gid nexgate --home-dir /var/lib/nexgate \
    --create-home --shell /usr/sbin/nologin nexgate
COPY --from=build /opt/nexgate /opt/nexgate
COPY config/nexgate.yaml /etc/nexgate/nexgate.yaml
ENV PATH=/opt/nexgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NEXGATE_CONFIG=/etc/nexgate/nexgate.yaml \
    NEXGATE_STORAGE_URL=sqlite:////var/lib/nexgate/nexgate.db
USER nexgate
WORKDIR /var/lib/nexgate
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["nexgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
