"""`sglang-dp inspect-tree`: what the router believes each worker holds, and why it routes.

Rendering of the router's debug data is pure (`render`); fetching and printing it is the shell
(`run`)."""
