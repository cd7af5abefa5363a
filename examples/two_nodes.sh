#!/usr/bin/env bash
# Two nodes, one router: node A runs the router (and its own workers), node B only workers that
# register with A's router (--no-router --register-with) and deregister when stopped.
set -euo pipefail
# on node A (10.0.0.1):
#   sglang-dp launch --model-path meta-llama/Llama-3.1-8B-Instruct --dp 8 --host 0.0.0.0 \
#       --worker-host 10.0.0.1 --admin-api-key "$ADMIN_KEY"
# on node B (10.0.0.2):
sglang-dp launch --model-path meta-llama/Llama-3.1-8B-Instruct --dp 8 \
    --worker-host 10.0.0.2 --no-router --register-with http://10.0.0.1:30000 \
    --admin-api-key "$ADMIN_KEY"
