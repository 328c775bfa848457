# One image for the stream worker and the feature server (docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# CPU torch first: a bare torch requirement would pull the CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY scripts/constraints.txt scripts/
COPY coldstart coldstart
COPY streams streams
COPY encoders encoders
COPY feature_repo feature_repo
RUN pip install --no-cache-dir -c scripts/constraints.txt . \
    && COLDSTART_ONNX_DIR=/app/onnx coldstart export
ENV COLDSTART_ONNX_DIR=/app/onnx COLDSTART_DATA_DIR=/data COLDSTART_PROFILE=prod
CMD ["coldstart", "worker"]
