"""Throwaway certificates for the sandbox (openssl): a self-signed CA and serving certificates
it signs, for the API server and for PostgreSQL's TLS."""

from __future__ import annotations

from pathlib import Path

from sandbox.procs import run


def make_ca(folder: Path, name: str, *, days: int) -> tuple[Path, Path]:
    """A self-signed CA ``folder/name.crt`` and its key ``folder/name.key``."""
    folder.mkdir(parents=True, exist_ok=True)
    crt, key = folder / f"{name}.crt", folder / f"{name}.key"
    run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days)),
            *("-subj", f"/CN={name}", "-keyout", str(key), "-out", str(crt)),
        ]
    )
    return crt, key


def sign_server_cert(
    folder: Path,
    name: str,
    *,
    ca: tuple[Path, Path],
    common_name: str,
    sans: list[str],
    days: int,
    extensions: str = "",
) -> tuple[Path, Path]:
    """A serving certificate ``folder/name.crt`` (key ``folder/name.key``) signed by ``ca``
    (certificate, key), naming ``sans`` (``IP:…``, ``DNS:…``)."""
    key, csr, crt = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    run(
        [
            *("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}"),
            *("-keyout", str(key), "-out", str(csr)),
        ]
    )
    ext = folder / f"{name}.ext"
    ext.write_text(f"{extensions}subjectAltName={','.join(sans)}\n")
    ca_crt, ca_key = ca
    run(
        [
            *(
                "openssl",
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(ca_crt),
                "-CAkey",
                str(ca_key),
            ),
            *("-CAcreateserial", "-days", str(days), "-extfile", str(ext), "-out", str(crt)),
        ]
    )
    return crt, key
