"""The ``illusion`` command and the client side of the cascade."""

import os

# gRPC's C core logs its own lines to stderr ("E1128 ... add_port.cc:83] Failed to add port ..."),
# beside the one-line errors that already say what went wrong and what to do. It reads this
# setting once, when grpc is first imported, so it is set here, before any import of grpc;
# GRPC_VERBOSITY=debug (or ERROR) in the environment brings the lines back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
