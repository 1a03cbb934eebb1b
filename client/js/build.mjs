import { build } from 'esbuild';

const common = {
  entryPoints: [],
  bundle: true,
  platform: 'browser',
  target: ['es2020'],
  sourcemap: true,
  logLevel: 'info',
};

await build({ ...common, entryPoints: ['src/index.js'], format: 'esm', outfile: 'dist/scalepub-client.js' });
await build({
  ...common, entryPoints: ['src/iife.js'], format: 'iife', globalName: 'ScalePub', minify: true,
  outfile: 'dist/scalepub-client.iife.js',
});
