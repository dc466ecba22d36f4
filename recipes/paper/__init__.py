"""Small experiments from Xu et al. (arXiv 2404.10719), runnable on a CPU in seconds."""
