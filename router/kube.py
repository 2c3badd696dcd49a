"""Follow a Kubernetes collection exactly: list, then watch from the list's resourceVersion.

This is client-go's reflector in small. A watch started without a resourceVersion (or resumed
from nothing after a gap) misses whatever happened in between, so a deleted pod could stay a
routing target for good. Instead:

- ``list()`` gives the whole collection and its resourceVersion; the consumer replaces what it
  knew (``SYNC``), which also drops objects deleted during a gap.
- ``watch(rv)`` continues from there; after a dropped connection the next watch resumes from the
  last resourceVersion seen, and the API server replays what was missed.
- When the server no longer has that history (410 Gone, "too old resource version") or has not
  caught up with it yet (504 "Too large resource version", a lagging cache), the next step is a
  fresh list.

The blocking ``kubernetes`` client runs in a thread; ``Reflector.stop`` wakes a watch parked in
its long poll at once (``Watch.stop`` shuts the socket down), so shutdown never waits for the
server's watch timeout. Sources are small objects with ``list``/``watch``/``cancel`` so tests
can script the API server's behaviour (gaps, 410s) exactly.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

log = logging.getLogger("tusk.router.kube")

SYNC = "SYNC"  # the consumer's event kind for "here is the whole collection"
Deliver = Callable[[str, Any], None]


class Gone(Exception):
    """The resourceVersion cannot be watched from: list again."""


class ListWatch(Protocol):
    def list(self) -> tuple[list[dict[str, Any]], str]:
        """Every object (as JSON dicts) and the collection's resourceVersion."""
        ...

    def watch(self, resource_version: str, timeout_s: int) -> Iterator[dict[str, Any]]:
        """Events ``{"type", "object"}`` after ``resource_version``; ends when the server closes
        the watch; raises ``Gone`` when the version cannot be watched from."""
        ...

    def cancel(self) -> None:
        """Wake a watch blocked in another thread (shutdown)."""
        ...


def _is_gone(status: int | None, text: str) -> bool:
    text = text.lower()
    return status == 410 or (status == 504 and "too large resource version" in text) or "expired" in text


class ClientListWatch:
    """``ListWatch`` over a list function of the ``kubernetes`` client, e.g.
    ``CoreV1Api.list_namespaced_pod`` with ``args=("ml",)``. Objects stay plain dicts: nothing
    is deserialised into model classes."""

    def __init__(
        self,
        list_fn: Callable[..., Any],
        *args: Any,
        label_selector: str | None = None,
        request_timeout_s: float = 30.0,
    ) -> None:
        self.list_fn = list_fn
        self.args = args
        self.label_selector = label_selector
        self.request_timeout_s = request_timeout_s
        self._watch: Any = None
        self._lock = threading.Lock()
        self._cancelled = False

    def _kwargs(self) -> dict[str, Any]:
        return {"label_selector": self.label_selector} if self.label_selector else {}

    def list(self) -> tuple[list[dict[str, Any]], str]:
        from kubernetes.client.exceptions import ApiException

        resp = self.list_fn(
            *self.args, **self._kwargs(), _preload_content=False, _request_timeout=self.request_timeout_s
        )
        data = resp.data
        if not 200 <= resp.status < 300:
            raise ApiException(status=resp.status, reason=resp.reason, body=data)
        body = json.loads(data)
        return list(body.get("items") or []), str((body.get("metadata") or {}).get("resourceVersion") or "")

    def watch(self, resource_version: str, timeout_s: int) -> Iterator[dict[str, Any]]:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        w = watch.Watch(return_type=object)
        with self._lock:
            if self._cancelled:
                return
            self._watch = w
        try:
            stream = w.stream(
                self.list_fn,
                *self.args,
                **self._kwargs(),
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                # The server ends the watch after timeout_s; the read timeout only guards
                # against one that does not.
                _request_timeout=(self.request_timeout_s, timeout_s + self.request_timeout_s),
            )
            for event in stream:
                yield {"type": event.get("type"), "object": event.get("raw_object")}
        except ApiException as exc:
            if _is_gone(exc.status, f"{exc.reason} {exc.body}"):
                raise Gone(f"{exc.status} {exc.reason}") from None
            raise
        finally:
            with self._lock:
                self._watch = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._watch is not None:
                self._watch.stop()


def pod_list_watch(api_client: Any, namespace: str | None, selector: str) -> ClientListWatch:
    """A list-then-watch source over the pods matching ``selector``, in ``namespace`` or, when it
    is empty, in every namespace."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    if namespace:
        return ClientListWatch(core.list_namespaced_pod, namespace, label_selector=selector)
    return ClientListWatch(core.list_pod_for_all_namespaces, label_selector=selector)


def resource_version(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return (meta or {}).get("resourceVersion")


class Reflector:
    """Keep ``deliver`` in step with one collection, in order, from a thread.

    ``deliver(SYNC, items)`` after every list, then ``deliver(type, obj)`` for each ADDED,
    MODIFIED and DELETED event, all from the reflector's thread, in the order the API server
    sent them. The consumer hands them to its event loop in that order
    (``loop.call_soon_threadsafe`` is FIFO).
    """

    def __init__(
        self,
        name: str,
        source: ListWatch,
        deliver: Deliver,
        *,
        watch_timeout_s: int = 300,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.name = name
        self.source = source
        self.deliver = deliver
        self.watch_timeout_s = watch_timeout_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.lists = 0  # how many times it listed (tests, logs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"watch {self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop at once; a thread stuck in a slow list is left behind (daemon) after ``timeout_s``."""
        self._stop.set()
        self.source.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("watch thread did not stop in time", extra={"watch": self.name})

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        version: str | None = None
        backoff = self.min_backoff_s
        gone_in_a_row = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    items, listed = self.source.list()
                    self.lists += 1
                    if self._stop.is_set():
                        return
                    self.deliver(SYNC, items)  # raises: the list is retried, not skipped
                    version = listed
                started, events = time.monotonic(), 0
                for event in self.source.watch(version, self.watch_timeout_s):
                    events += 1
                    if self._stop.is_set():
                        return
                    kind, obj = event.get("type"), event.get("object")
                    if kind == "ERROR":  # a source that reports errors as events
                        code = (obj or {}).get("code")
                        if _is_gone(code, str((obj or {}).get("message", ""))):
                            raise Gone(str(code))
                        raise RuntimeError(f"watch error {code}: {(obj or {}).get('message')}")
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.deliver(kind, obj)  # raises: the watch resumes before this event
                    version = resource_version(obj) or version  # BOOKMARKs only move this on
                    gone_in_a_row = 0
                backoff = self.min_backoff_s
                if not events and time.monotonic() - started < 1.0:
                    self._stop.wait(self.min_backoff_s)  # a server that closes watches at once
            except Gone as exc:
                if self._stop.is_set():
                    return
                log.info("watch history gone; listing again", extra={"watch": self.name, "error": str(exc)})
                version = None
                gone_in_a_row += 1
                if gone_in_a_row > 1:  # a lagging watch cache ("too large"): do not hammer it
                    self._stop.wait(min(self.min_backoff_s * 2 ** (gone_in_a_row - 2), self.max_backoff_s))
            except Exception as exc:  # noqa: BLE001 - an API server restart, RBAC, the network
                if self._stop.is_set():
                    return
                log.warning("watch failed; retrying", extra={"watch": self.name, "error": str(exc)[:500]})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
