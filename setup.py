"""Packaging for snet: the package, its twistd plugins, and their dependencies."""

from setuptools import find_packages, setup

setup(
    name="snet",
    version="0.1.0",
    description="Social network back end: a Twisted monolith and Consul-discovered chat service",
    python_requires=">=3.11",
    packages=[*find_packages(include=["snet", "snet.*"]), "twisted.plugins"],
    package_dir={"twisted.plugins": "twisted_plugins"},
    package_data={
        "snet": ["py.typed"],
        "snet.chat": ["schema.sql"],
        # openapi.json: the published API document (docs/openapi/snet-1.0.json links to it).
        # static/: the web pages' stylesheet and script (snet.server.pages).
        "snet.server": ["schema.sql", "openapi.json", "static/*.css", "static/*.js"],
    },
    include_package_data=True,
    zip_safe=False,
    install_requires=[
        # [tls]: pyOpenSSL, service_identity and idna, for the Connect TLS in snet.connect.
        "twisted[tls]>=24.7.0",
        "klein>=24.8.0",
        "treq>=24.9.1",
        "txredisapi>=1.4.10",
        "pymysql>=1.1.1",
        "attrs>=24.2.0",
        "py-consul>=1.5.0",
        "prometheus-client>=0.20.0",
        # snet.connect: contexts from cryptography keys and get_verified_chain (24.3+), and
        # cryptography's own X.509 API (load_pem_x509_certificates, not_valid_after_utc).
        "pyOpenSSL>=24.3.0",
        "cryptography>=42.0.0",
    ],
)
