# The node image cluster.yaml can name: Ray 2.60's GPU image with busdiff and all its dependencies (torch,
# diffusers, ...) installed, so that a node the autoscaler adds starts Ray at once instead of pip-installing
# them at boot (minutes per scale-up with the plain Ray image).
#
#   docker build -t REGISTRY/busdiff:0.1.0 .
#   docker push REGISTRY/busdiff:0.1.0
#   cluster.yaml:  docker: {image: REGISTRY/busdiff:0.1.0, ...}
#                  setup_commands: ["pip install -q --no-deps -e /home/ray/busdiff"]   # seconds: source only
#
# tests/unit/test_container_image.py checks what CI can without a Docker daemon: the base image is
# cluster.yaml's, every COPY source exists, and the install step's wheel installs and imports.
FROM rayproject/ray:2.60.0-py311-gpu

# made by the image's user (ray), not by WORKDIR as root: the install steps write build files here
RUN mkdir -p /home/ray/busdiff
WORKDIR /home/ray/busdiff
# The dependencies' layer changes only with pyproject.toml: the source is copied after it.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform/busdiff/__init__.py platform/busdiff/__init__.py
RUN pip install --no-cache-dir . && pip uninstall -y busdiff
COPY --chown=ray:users platform/ platform/
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users serve/ serve/
RUN pip install --no-cache-dir --no-deps -e . && python -c "import busdiff.cli, torch, diffusers, ray"
