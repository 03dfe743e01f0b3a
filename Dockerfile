FROM python:3.11-slim
# A plain (non-editable) install: examples and the Kafka pom ship as package data,
# so nothing at run time reads the source tree, which is removed after the install.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY riverflow riverflow
COPY streams streams
COPY features features
COPY models models
COPY monitors monitors
COPY examples examples
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /app
USER nobody
CMD ["riverflow", "--help"]
