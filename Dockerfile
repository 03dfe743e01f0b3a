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
# the learner's index of scored events (RIVERFLOW_SCORED_DIR) lives on a volume
# mounted here: a volume takes the directory's owner, so nobody can write it
RUN mkdir -p /var/lib/riverflow && chown nobody /var/lib/riverflow
WORKDIR /app
USER nobody
CMD ["riverflow", "--help"]
