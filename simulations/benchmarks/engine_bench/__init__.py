"""Benchmark fedeq's Ray device engine (:class:`fedeq.engines.ray.grid.RayGrid`), side by side with Flower's.

Every measurement runs in a fresh child process (the two engines never share a Ray instance, and peak
memory belongs to one run); the parent prints the tables and writes ``--csv``. Sections:

``overhead``
    A trivial ClientApp (``engine_bench.apps:echo_app``: echo the arrays, three metrics) driven by the
    same FedAvg round loop (``configure_train`` → ``send_and_receive`` → ``aggregate_train``) on (a) a
    ``RayGrid`` and (b) Flower's ``run_simulation`` with a ServerApp, both with the same number of 1-CPU
    actors. *Per call*: round wall / clients at ``--clients`` per round; *per round floor*: median round
    wall at 1 client. The first round (actor start) is left out; engines alternate over ``--repeat`` runs;
    medians.
``efficiency``
    The default workload (``fedeq simulate`` defaults: 4 tiers, digits, Dirichlet) at 100 clients per
    round on fedeq's engine through ``run_ray_simulation``. Per round: the grid's train
    ``send_and_receive`` wall, the ClientApp's busy time per actor (measured inside the actors) and
    ``compute_s`` / ``compute_cpu_s`` (wall and CPU time in ``train_local``, from ``clients.csv``).
    Efficiency = Σ compute_s / (wall × actors), and the machine's view Σ compute_cpu_s / (wall × cores);
    the bottleneck view compares the round's wall with the slowest pool's summed time.
``scale``
    A synthetic npz (60,000 images, 8×8 by default), ``num_clients`` registered (default 1k, 3k, 10k),
    100 per round, 3 rounds, small model: start time (process start → first round dispatched, with its
    phases) and peak RSS of the driver and of the actors (as the kernel counts it), of every process of the
    run's Ray cluster (sampled every 0.5 s with psutil) and the peak summed PSS.
``throughput``
    Client updates per second of the real ClientApp (``clients.client_app:app``) with clients sharing a
    device: fedeq's engine (a tier with ``num_gpus = --gpu-share``), Flower's engine (``client_resources``
    with the same share) and a framework-free sequential loop (``train_local`` + validation per client).
    Meant for a GPU machine (``--device cuda --gpu-share 0.25``); ``--device cpu`` runs the same code here.

Examples::

    python simulations/benchmarks/engine.py                              # overhead, efficiency, scale
    python simulations/benchmarks/engine.py overhead --repeat 5 --csv engine.csv
    python simulations/benchmarks/engine.py scale --scale-clients 10000
    python simulations/benchmarks/engine.py throughput --device cuda --gpu-share 0.25 --tp-clients 64
"""
