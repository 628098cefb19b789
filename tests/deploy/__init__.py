"""Static checks of ``deploy/``: compose, Kubernetes, the image, Prometheus and Grafana."""
