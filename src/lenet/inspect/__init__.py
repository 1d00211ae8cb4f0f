"""Looking at a trained model: evaluation reports, feature maps, filters, mistakes, figures."""
