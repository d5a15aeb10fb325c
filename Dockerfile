# The FLHF app image: Flower's SuperExec with FLHF and a CPU build of PyTorch.
# Used by docker-compose.yml for the ServerApp executor and every ClientApp executor.
FROM flwr/superexec:1.42.0

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY flhf_core ./flhf_core
COPY server_app.py client_app.py ./
COPY configs ./configs

# torch first, from the CPU index: an unpinned torch would pull a multi-GB CUDA build.
RUN python -m pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && python -m pip install --no-cache-dir -c constraints.txt .

ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
ENTRYPOINT ["flower-superexec"]
