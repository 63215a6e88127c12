from lorakit.pretrain.train import main

raise SystemExit(main())
