#!/usr/bin/python3
"""Local SMTP server for Kizuna's mail tests and `kizuna demo` (aiosmtpd).

    smtp-test-server.py MODE PORT [--dir DIR] [--delay SECS] [--slow-phase all|data]
                        [--tls none|starttls|implicit --cert PEM --key PEM]
                        [--auth USER:PASSWORD] [--mode-file PATH]

Listens on 127.0.0.1:PORT (0 = any free port) and prints one line
"ready PORT" on stdout once it accepts connections.

Modes:
  accept           250 to everything; each message is written to DIR as
                   <time_ns>-<n>.eml (headers and body as received, CRLF kept)
  tempfail         451 to RCPT TO
  permfail         550 to RCPT TO
  drop-after-data  receives the whole message (written to DIR if given),
                   then closes the connection without replying to the "."
  slow             delays replies by --delay seconds: every reply incl.
                   the greeting (--slow-phase all, default) or only the
                   reply to the final "." (--slow-phase data); then accepts
TLS: --tls starttls offers STARTTLS and refuses mail before it;
--tls implicit speaks TLS from the first byte (port 465 style). Both
use the certificate and key given (tests generate their own).
--auth USER:PASSWORD requires AUTH (PLAIN or LOGIN, over TLS only when
--tls starttls) with exactly these credentials; others get 535.
--mode-file PATH: when PATH exists, its content (one of accept, tempfail,
permfail, drop-after-data) is the mode for each RCPT and DATA from then
on, so a test changes the server's behaviour without giving up its port
(a port released between two servers can be taken by any other process).
Needs python3-aiosmtpd (deploy/scripts/setup.sh installs it).
"""
import argparse
import asyncio
import itertools
import os
import sys
import time

import ssl

from aiosmtpd.smtp import SMTP, AuthResult

MODES = ["accept", "tempfail", "permfail", "drop-after-data", "slow"]
# Modes --mode-file may switch to ("slow" changes how a connection is
# served, so it is chosen at start only).
SWITCHABLE = ["accept", "tempfail", "permfail", "drop-after-data"]


class Handler:
    def __init__(self, args):
        self.args = args
        self.counter = itertools.count(1)

    def mode(self):
        if self.args.mode_file:
            try:
                with open(self.args.mode_file) as f:
                    m = f.read().strip()
            except FileNotFoundError:
                return self.args.mode
            if m not in SWITCHABLE:
                raise SystemExit("--mode-file: unknown mode %r" % m)
            return m
        return self.args.mode

    def store(self, envelope):
        if not self.args.dir:
            return
        os.makedirs(self.args.dir, exist_ok=True)
        n = next(self.counter)
        # Names sort in arrival order, across restarts of the server too.
        name = "%020d-%06d.eml" % (time.time_ns(), n)
        tmp = os.path.join(self.args.dir, "." + name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(envelope.original_content or envelope.content)
        os.rename(tmp, os.path.join(self.args.dir, name))

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        mode = self.mode()
        if mode == "tempfail":
            return "451 4.3.0 temporary failure, try again later"
        if mode == "permfail":
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.mode() == "drop-after-data":
            self.store(envelope)
            # abort(): later writes (aiosmtpd's own reply) are discarded.
            server.transport.abort()
            return "250 never sent"
        if self.args.mode == "slow" and self.args.slow_phase == "data":
            await asyncio.sleep(self.args.delay)
        self.store(envelope)
        return "250 OK queued"


class SlowSMTP(SMTP):
    """Delays every reply, the greeting included."""

    def __init__(self, *a, delay=0.0, **kw):
        super().__init__(*a, **kw)
        self._delay = delay

    async def push(self, status):
        await asyncio.sleep(self._delay)
        await super().push(status)


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=MODES)
    p.add_argument("port", type=int)
    p.add_argument("--dir")
    p.add_argument("--delay", type=float, default=5.0)
    p.add_argument("--slow-phase", choices=["all", "data"], default="all")
    p.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--auth", help="USER:PASSWORD required for AUTH PLAIN/LOGIN")
    p.add_argument("--mode-file", help="file whose content switches the mode while running")
    args = p.parse_args()
    if (args.mode == "accept" or args.mode_file) and not args.dir:
        p.error("accept (and --mode-file, which may switch to it) needs --dir")
    handler = Handler(args)
    context = None
    if args.tls != "none":
        if not (args.cert and args.key):
            p.error("--tls needs --cert and --key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)

    def authenticator(server, session, envelope, mechanism, auth_data):
        user, _, password = args.auth.partition(":")
        ok = auth_data.login == user.encode() and auth_data.password == password.encode()
        return AuthResult(success=ok, handled=False)

    def factory():
        kw = dict(hostname="smtp-test.invalid", decode_data=False, enable_SMTPUTF8=True)
        if args.tls == "starttls":
            kw.update(tls_context=context, require_starttls=True)
        if args.auth:
            # Implicit TLS is TLS from the first byte; aiosmtpd only knows
            # about STARTTLS when it checks "AUTH over TLS".
            kw.update(authenticator=authenticator, auth_required=True,
                      auth_require_tls=args.tls == "starttls")
        if args.mode == "slow" and args.slow_phase == "all":
            return SlowSMTP(handler, delay=args.delay, **kw)
        return SMTP(handler, **kw)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory, host="127.0.0.1", port=args.port, reuse_address=True,
        ssl=context if args.tls == "implicit" else None)
    port = server.sockets[0].getsockname()[1]
    print("ready %d" % port, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
