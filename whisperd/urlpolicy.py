"""Which URLs the server may call on a client's behalf: http(s) only, to hosts an allow-list admits.

One policy for every outgoing request a client can aim (webhooks' callback_url, the media
fetched by `url=`): without it, anyone who can submit a job could make the server send requests
to its own loopback or to hosts on its private network (SSRF). The check runs twice: at
submission, for a clear 400, and at connect time on the very addresses the connection then
uses, so a name that resolves to a public address at submission and to 127.0.0.1 later (DNS
rebinding) is refused. Hosts written as bare or octal/hex numbers (http://2130706433/,
http://0177.0.0.1/) are refused by form: resolvers read them as addresses in ways that differ.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tornado.netutil import DefaultLoopResolver, Resolver

PUBLIC = "public"  # every globally routable address, and nothing private, loopback or reserved
MAX_URL_CHARS = 2000
_HOST_NAME = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, translated, NAT64, 6to4, Teredo)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # :: and ::1 are IPv6's own
        return [low32]
    if address in _IPV4_TRANSLATED or any(address in network for network in _NAT64):
        return [low32]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)  # (server, client): both must be allowed
    return []


class PolicyError(Exception):
    """The URL or address may not be called; the message says why and what would be allowed."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ANY_PORT = 0  # an entry without ":port"


def _split_port(entry: str) -> tuple[str, int]:
    """'host:port', '[v6]:port', '10.0.0.0/8:8080' -> (host, port); no port -> (entry, ANY_PORT)."""
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: write an IPv6 address with a port as [address]:port")
        return inside, _port(entry, rest[1:]) if rest else ANY_PORT
    if entry.count(":") == 1:  # more than one: an IPv6 address or network without a port
        host, _, port = entry.partition(":")
        return host, _port(entry, port)
    return entry, ANY_PORT


def _port(entry: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(text)


@dataclass(frozen=True)
class HostPolicy:
    public: bool = False
    # Each entry with the one port it admits, or ANY_PORT.
    networks: tuple[tuple[Network, int], ...] = ()
    names: tuple[tuple[str, int], ...] = ()  # exact names, or "*.example.com" for any name under it
    text: str = field(default="", compare=False)
    setting: str = field(default="WHISPER_WEBHOOK_ALLOWED_HOSTS", compare=False)  # named in refusals
    subject: str = field(default="callback", compare=False)  # "callback host x resolves to ..."

    @classmethod
    def parse(cls, text: str, setting: str = "WHISPER_WEBHOOK_ALLOWED_HOSTS", subject: str = "callback",
              public: bool = False) -> "HostPolicy":
        """Comma- or space-separated: 'public', IPs or CIDR networks, host names, '*.domain', each
        of the last four optionally with ':port' ('[v6]:port' for IPv6), which then admits that
        port only.

        public=True admits public addresses whatever the text says (the fetch policy: the list
        only adds hosts)."""
        networks, names = [], []
        for entry in re.split(r"[,\s]+", text.strip().lower()):
            if not entry:
                continue
            if entry == PUBLIC:
                public = True
                continue
            host, port = _split_port(entry)
            try:
                networks.append((ipaddress.ip_network(host, strict=False), port))
                continue
            except ValueError:
                pass
            if not _HOST_NAME.match(host):
                raise ValueError(f"{entry!r} is not 'public', an IP address, a CIDR network or a host name "
                                 "(each optionally with :port)")
            names.append((host, port))
        return cls(public, tuple(networks), tuple(names), text, setting, subject)

    def describe(self) -> str:
        def shown(host: str, port: int, v6: bool) -> str:
            if port == ANY_PORT:
                return host
            return f"[{host}]:{port}" if v6 else f"{host}:{port}"

        parts = (["public addresses"] if self.public else []) + \
            [shown(str(n), p, n.version == 6) for n, p in self.networks] + [shown(n, p, False) for n, p in self.names]
        return ", ".join(parts) or "nothing"

    def allows_name(self, host: str, port: int = ANY_PORT) -> bool:
        host = host.lower().rstrip(".")
        for name, allowed_port in self.names:
            if allowed_port not in (ANY_PORT, port):
                continue
            if name.startswith("*.") and host.endswith(name[1:]):
                return True
            if host == name:
                return True
        return False

    def _listed(self, address: IPAddress, port: int) -> bool:
        return any(address in network and allowed in (ANY_PORT, port) for network, allowed in self.networks)

    def allows_ip(self, address: IPAddress, port: int = ANY_PORT, public: bool | None = None) -> bool:
        """Listed (with this port), or public when public addresses are admitted (`public`: instead
        of the policy's own answer, for names the list admits)."""
        if self._listed(address, port):
            return True
        embedded = embedded_ipv4(address)
        if embedded:  # ::7f00:1 and 64:ff9b::7f00:1 reach 127.0.0.1: judged as what they reach
            return all(self.allows_ip(inner, port, public) for inner in embedded)
        public = self.public if public is None else public
        return public and address.is_global and not address.is_multicast

    def check_ip(self, host: str, address: IPAddress, port: int = ANY_PORT, named: bool = False) -> None:
        """PolicyError unless `address` (port `port`) may be called. named: `host` is a name the
        list admits, so public addresses are fine, private ones only where a range lists them."""
        if not self.allows_ip(address, port, True if named else None):
            what = (f"{self.subject} address {address} is" if host.strip("[]") == str(address)
                    else f"{self.subject} host {host} resolves to {address}, which is")
            where = f" (port {port})" if any(p != ANY_PORT for _n, p in self.networks + self.names) else ""
            listed_name = ("; a host name in the list reaches a private address only when the list names "
                           "that address or its range too") if named else ""
            raise PolicyError(
                f"{what} not allowed{where} by {self.setting} (allowed: {self.describe()}); "
                f"private, loopback and link-local addresses are refused by default{listed_name}"
            )


_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def check_url(url: str, name: str = "callback_url",
              credentials_hint: str = "check the X-Whisperd-Signature instead") -> tuple[str, str, int]:
    """The URL's (scheme, host, port) when its form is acceptable; PolicyError otherwise.

    `name` is the form field the client set, named in every refusal."""
    if len(url) > MAX_URL_CHARS:
        raise PolicyError(f"{name} is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise PolicyError(f"{name} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise PolicyError(f"{name} must be an http:// or https:// URL")
    if not parts.hostname:
        raise PolicyError(f"{name} has no host")
    if parts.username is not None or parts.password is not None:
        raise PolicyError(f"{name} must not contain user:password@; {credentials_hint}")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise PolicyError(f"{name} must not contain spaces or control characters")
    host = parts.hostname
    labels = host.rstrip(".").split(".")
    if literal_ip(host) is None and all(_NUMERIC_LABEL.match(label) for label in labels):
        # 2130706433, 0177.0.0.1, 0x7f.1: inet_aton reads these as 127.0.0.1; ipaddress does not.
        raise PolicyError(f"{name} host {host[:60]!r} is a number but not a dotted-decimal IP address; "
                          "write IPv4 addresses as four decimal numbers (e.g. 192.0.2.10)")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


async def resolve_checked(policy: HostPolicy, host: str, port: int,
                          family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
    """Resolve `host` and return its addresses, or PolicyError if any of them is not allowed.

    One refused address refuses the host: a name that answers with a public and a private
    address would otherwise let the connection pick the private one. A name the list admits is
    checked too: it may reach public addresses, and private ones only where the list names
    their address or range (a name is not a way around the address check).
    """
    address = literal_ip(host)
    if address is not None:
        policy.check_ip(host, address, port)
        return await DefaultLoopResolver().resolve(str(address), port, family)
    named = policy.allows_name(host, port)
    try:
        found = await DefaultLoopResolver().resolve(host, port, family)
    except (socket.gaierror, OSError) as exc:
        raise OSError(f"cannot resolve {policy.subject} host {host}: {exc.strerror or exc}") from None
    for _family, sockaddr in found:
        policy.check_ip(host, ipaddress.ip_address(sockaddr[0].split("%")[0]), port, named)
    return found


class CheckingResolver(Resolver):
    """The resolver an outgoing HTTP client connects through: it only ever sees checked addresses."""

    def initialize(self, policy: HostPolicy) -> None:  # type: ignore[override]
        self.policy = policy

    async def resolve(self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC):  # type: ignore[override]
        return await resolve_checked(self.policy, host, port, family)
