"""`sglang-dp inspect-tree`: what the router believes each worker holds, and why it routes."""
