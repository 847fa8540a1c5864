"""GAN networks: pix2pix / pix2pixHD (`pix2pix`), SPADE / GauGAN (`spade`), StyleGAN2."""
