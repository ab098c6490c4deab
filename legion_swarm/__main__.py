from legion_swarm.cli import main

raise SystemExit(main())
