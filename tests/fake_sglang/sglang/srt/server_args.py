"""What the launcher's pre-flight check reads: this stand-in accepts "--nccl-port"."""
