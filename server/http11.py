"""uvicorn's HTTP/1.1 protocol (h11) with a read timeout, against slowloris clients.

    config = uvicorn.Config(app, http=TimedH11)
    config.read_timeout = 30.0   # seconds

uvicorn closes an idle keep-alive connection after a few seconds, but only once a first answer
was sent, and any byte a client sends stops that timer; a connection that opens and then sends
its headers one byte at a time is held for ever. Here every connection has `read_timeout`
seconds, from when it opens or from the end of its previous answer, to complete a request's
headers; past that it is closed. (A request's body has the same time: server/app.py read_json.)
"""
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11(H11Protocol):
    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline = None
        self._arm()

    def _arm(self):
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.config.read_timeout, self._too_slow)

    def _too_slow(self):
        """Close the connection unless a request is being answered (its headers came)."""
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)
