"""The experiment application built on csext: the ticket search and its baselines, the data sets
and networks of the paper's experiments, sweeps, plots and the command line
(`python -m csext search|compare|sweep`). The library (`import csext`) imports none of it.

    search       the CS ticket search (Algorithm 1 of the paper), resumable epoch by epoch
    compare      CS against the baselines on one setup
    baselines    IMP, magnitude, SNIP, L0 and random pruning
    sweep        a grid of searches
    cli          the command line
    data, nets   data sets and networks; distributed: torchrun helpers; plots, files: output
"""
