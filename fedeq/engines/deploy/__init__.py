"""Run fedeq on Flower's deployment runtime: one SuperLink, many SuperNodes, ``flwr run`` to submit.

Building blocks (each usable on its own machine):

* :func:`superlink_argv` / :func:`supernode_argv`: the ``flower-superlink`` / ``flower-supernode`` command
  lines, TLS and SuperNode authentication on unless ``insecure``
  (:mod:`~fedeq.engines.deploy.superlink`, :mod:`~fedeq.engines.deploy.supernode`);
* :func:`write_connection`, :func:`register_node`, :func:`submit_argv`, :func:`run_status`: the ``flwr`` CLI
  against that SuperLink, with ``FLWR_HOME`` in a private folder (:func:`flwr_env`);
* :func:`prepare_run_config`: the fedeq config of a deployed run (one partition per SuperNode, absolute
  output folder) written as a ``flwr run --run-config`` TOML file (:mod:`~fedeq.engines.deploy.submission`);
* :class:`LocalDeployment`: everything on this machine (certificates, SuperLink, N SuperNodes, the run,
  the results), every process stopped by pid on exit, Ctrl-C and failure
  (:mod:`~fedeq.engines.deploy.launcher`; processes: :mod:`~fedeq.engines.deploy.processes`).

Argument problems raise :class:`DeployError` naming the argument, before anything is started.
"""

from fedeq.engines.deploy.launcher import LocalDeployment
from fedeq.engines.deploy.layout import (
    OUTPUT_FILES,
    DeployError,
    app_dir,
    check_certs,
    default_out_dir,
    default_run_name,
    verify_outputs,
)
from fedeq.engines.deploy.network import (
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    check_port_free,
    free_port,
    split_address,
    wait_for_port,
)
from fedeq.engines.deploy.submission import (
    RunOutcome,
    Submission,
    prepare_run_config,
    submit_argv,
    write_run_config,
)
from fedeq.engines.deploy.superlink import (
    CONNECTION_NAME,
    flwr_env,
    register_node,
    run_status,
    superlink_argv,
    write_connection,
)
from fedeq.engines.deploy.supernode import node_config_arg, node_tiers, supernode_argv

__all__ = [
    "CONNECTION_NAME",
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "OUTPUT_FILES",
    "DeployError",
    "LocalDeployment",
    "RunOutcome",
    "Submission",
    "app_dir",
    "check_certs",
    "check_port_free",
    "default_out_dir",
    "default_run_name",
    "flwr_env",
    "free_port",
    "node_config_arg",
    "node_tiers",
    "prepare_run_config",
    "register_node",
    "run_status",
    "split_address",
    "submit_argv",
    "superlink_argv",
    "supernode_argv",
    "verify_outputs",
    "wait_for_port",
    "write_connection",
    "write_run_config",
]
