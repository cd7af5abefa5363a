"""What a failed (or refused) attempt at a worker becomes: one decision table (pure).

Both execution paths of `router/proxy.py` (the task-less one and the task) ask `decide` the same
question and do what it answers; nothing else in the router decides it.

    decide(fault, status, flushed, retries_left) -> Verdict(action, status, blame)

Inputs:
- `fault`: what happened (`Fault`): the connect failed (the request never left), a local
  resource error of the router's own (EMFILE, ENOBUFS: not the worker's fault), the worker
  closed or broke the connection, its response could not be parsed, a timeout, or the worker
  answered with a status (`status`);
- `flushed`: bytes of the response already reached the client (its head went out). This, and
  not "the worker began to answer", is what ends retrying: once a byte is out there is no
  second answer, only an ended stream;
- `retries_left`: attempts the request may still make elsewhere.

The table (first row that matches):

    fault           flushed  retries left   action                              blame the worker
    any             yes      any            BREAK: SSE error event, close, no   yes (but LOCAL)
                                            clean `0\\r\\n\\r\\n` terminator
    LOCAL           no       any            ANSWER 503 (the router's own limit) no
    TIMEOUT         no       any            ANSWER 504 (a retry doubles the     yes
                                            client's wait)
    STATUS retryable no      yes            RETRY                               yes
    STATUS other    no       any            RELAY the worker's own answer       5xx only
    CONNECT/CLOSED/ no       yes            RETRY                               yes
    PROTOCOL        no       no             ANSWER 502                          yes

Retryable statuses: 408, 429, 500, 502, 503, 504 (`RETRY_STATUSES`). A retry never happens after
a timeout: the worker may still be computing, and the client's wait would double.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class Fault(enum.Enum):
    """What went wrong with one attempt (see the module docstring)."""

    CONNECT = "connect_error"  # no connection: the request certainly did not reach the worker
    LOCAL = "local_resource"  # the router ran out of something (file descriptors, buffers)
    CLOSED = "upstream_closed"  # the worker closed or reset the connection after the request
    PROTOCOL = "protocol_error"  # the worker's bytes are not HTTP/1.1 (a garbled chunk)
    TIMEOUT = "timeout"  # no head, or a body gap, within the request timeout
    STATUS = "status"  # the worker answered with a status (`status`)


class Action(enum.Enum):
    RETRY = "retry"  # route the request to another worker
    ANSWER = "answer"  # answer the client with the router's own error (`Verdict.status`)
    RELAY = "relay"  # pass on the worker's own (error) answer
    BREAK = "break"  # a response is under way: an SSE error event, then close (no terminator)


class Verdict(NamedTuple):
    action: Action
    status: int  # the status the client gets (ANSWER, RELAY), else 0
    blame: bool  # count the attempt as the worker's failure


def decide(fault: Fault, status: int, flushed: bool, retries_left: int) -> Verdict:
    """The table in the module docstring."""
    if flushed:
        return Verdict(Action.BREAK, 0, fault is not Fault.LOCAL)
    if fault is Fault.LOCAL:
        return Verdict(Action.ANSWER, 503, False)
    if fault is Fault.TIMEOUT:
        return Verdict(Action.ANSWER, 504, True)
    if fault is Fault.STATUS:
        if status in RETRY_STATUSES and retries_left > 0:
            return Verdict(Action.RETRY, 0, True)
        return Verdict(Action.RELAY, status, status >= 500)
    if retries_left > 0:
        return Verdict(Action.RETRY, 0, True)
    return Verdict(Action.ANSWER, 502, True)
